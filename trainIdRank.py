"""Train IdRank (see README: Training). Usage: python trainIdRank.py --cfg configs/demo/idrank.yml [--opt key=value] [--resume | --overwrite]"""

from ofer.train.cli import main

if __name__ == "__main__":
    main("idrank")
