"""The deployment targets of `vlhub convert --to`: one folder each, with its layout builder, exporter and smoke
runner."""
