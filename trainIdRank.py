"""Train IdRank (see README: Training). Usage: python trainIdRank.py --cfg configs/demo/idrank.yml [--opt key=value] [--resume | --overwrite]"""

from ofer.entry import run_command

if __name__ == "__main__":
    run_command("ofer.train.cli", "main", "idrank")  # SIGTERM handled as Ctrl-C from here on
