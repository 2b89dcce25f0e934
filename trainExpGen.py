"""Train ExpGen (see README: Training). Usage: python trainExpGen.py --cfg configs/demo/expgen.yml [--opt key=value] [--resume | --overwrite]"""

from ofer.entry import run_command

if __name__ == "__main__":
    run_command("ofer.train.cli", "main", "expgen")  # SIGTERM handled as Ctrl-C from here on
