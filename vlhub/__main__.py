from vlhub.cli.entry import main

main()
