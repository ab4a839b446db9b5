"""Train one model, or a sweep with -m: the same as `normbench train`, from a checkout.

    python run.py norm=gn batch=2                       # one run
    python run.py -m norm=bn,gn batch=32,8,2            # a sweep
    python run.py -m experiment=demo                    # a named sweep from experiments/
    torchrun --nproc_per_node=4 run.py norm=gn batch=2  # 4 processes x 2 virtual workers

The entry point itself (Hydra's main, its resolvers) is normbench/hydra_main.py.
"""

from normbench.hydra_main import main

if __name__ == "__main__":
    main()
