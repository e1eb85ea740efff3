from makeusrich.cli import main

main()
