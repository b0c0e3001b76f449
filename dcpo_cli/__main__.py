from dcpo_cli.cli import main

main()
