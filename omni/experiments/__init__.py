"""The recipes: one module per experiment, sharing its name with experiments/NAME.yaml and
notebooks/NN_NAME, each with a config dataclass and `run(config, tracker)`; plus what they share
(trained.py: one loader for trained runs; plots.py and embedding_page.py: figures and pages)."""
