"""Train ExpGen (see README: Training). Usage: python trainExpGen.py --cfg configs/demo/expgen.yml [--opt key=value] [--resume | --overwrite]"""

from ofer.train.cli import main

if __name__ == "__main__":
    main("expgen")
