"""Where vlhub keeps what it makes: built-in tiny models now, downloads and deployment layouts later."""
