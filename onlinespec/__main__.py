from onlinespec.cli import main

main()
