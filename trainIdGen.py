"""Train IdGen (see README: Training). Usage: python trainIdGen.py --cfg configs/demo/idgen.yml [--opt key=value] [--resume | --overwrite]"""

from ofer.entry import run_command

if __name__ == "__main__":
    run_command("ofer.train.cli", "main", "idgen")  # SIGTERM handled as Ctrl-C from here on
