from pushfw.worker.cli import main

main()
