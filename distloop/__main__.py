from distloop.cli import main

main()
