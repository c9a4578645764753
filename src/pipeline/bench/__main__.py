"""python -m pipeline.bench"""

from pipeline.bench.main import main

main()
