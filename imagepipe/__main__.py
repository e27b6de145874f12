"""``python -m imagepipe`` is the ``imagepipe`` command."""

from imagepipe.entry import main

if __name__ == "__main__":
    main()
