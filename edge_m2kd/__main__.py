from edge_m2kd.cli import main

main()
