"""``python -m blkverify_rs`` runs the ``blkverify`` command."""

from blkverify_rs.cli import main

if __name__ == "__main__":
    main()
