from heartline._cli import main

main()
