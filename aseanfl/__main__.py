from aseanfl.cli import main

main()
