"""`vlhub models`: the models vlhub knows.

Examples:
    vlhub models
    vlhub models --json
"""

from __future__ import annotations

from rich.table import Table

from vlhub.catalog import models as catalog_models
from vlhub.cli._errors import reports_errors
from vlhub.cli._options import JsonOpt
from vlhub.cli._output import print_json, stdout
from vlhub.units import format_count, format_size


@reports_errors
def models(json: JsonOpt = False) -> None:
    """List the supported models, official and built-in tiny.

    Official checkpoints (downloaded when a command needs them) and the built-in tiny ones (no download)."""
    specs = list(catalog_models().values())
    if json:
        print_json([spec.to_json() for spec in specs])
        return
    table = Table("name", "family", "params", "bf16 size", "tied", "Hugging Face", "ModelScope", box=None)
    for spec in specs:
        table.add_row(
            spec.name + (" *" if spec.refused else ""), spec.family.name, format_count(spec.params),
            format_size(spec.size_bytes), "yes" if spec.tie_word_embeddings else "no",
            spec.hf_repo or "built in", spec.modelscope_repo or "built in",
        )
    stdout.print(table)
    refused = {spec.refused for spec in specs if spec.refused}
    for reason in sorted(refused):
        stdout.print(f"* listed, not converted: {reason}")
