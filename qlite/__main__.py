from qlite.cli import main

main()
