"""`python -m mobilebench` and `torchrun -m mobilebench` enter the same CLI."""

from mobilebench.cli import main

if __name__ == "__main__":
    main()
