"""Train IdGen (see README: Training). Usage: python trainIdGen.py --cfg configs/demo/idgen.yml [--opt key=value] [--resume | --overwrite]"""

from ofer.train.cli import main

if __name__ == "__main__":
    main("idgen")
