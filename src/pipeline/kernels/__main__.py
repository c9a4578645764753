"""`python -m pipeline.kernels`: build (or load) the kernel for this CPU kind now."""

from pipeline.kernels import main

main()
