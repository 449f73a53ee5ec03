"""`--to vamc`: the weight folder, yamls and embedding table VastAI's vamc compiler and vastgenx server take."""
