from pushfw.producer.cli import main

main()
