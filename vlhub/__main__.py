from vlhub.cli.app import main

main()
