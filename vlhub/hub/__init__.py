"""Where checkpoints come from and where vlhub keeps what it makes: downloads from the Hugging Face Hub and
ModelScope, the built-in tiny models, and the managed cache under $VLHUB_HOME."""
