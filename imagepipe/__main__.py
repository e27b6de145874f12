"""``python -m imagepipe`` is the ``imagepipe`` command."""

from imagepipe.cli import main

if __name__ == "__main__":
    main()
