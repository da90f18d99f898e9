"""fedtune's Flower apps, bound to the experiment TOML shipped in this folder (see pyproject.toml)."""

from pathlib import Path

from fedtune.runtime.flower.client_app import make_client_app
from fedtune.runtime.flower.experiment_source import from_app_dir
from fedtune.runtime.flower.server_app import make_server_app

_experiment = from_app_dir(Path(__file__).parent)
server_app = make_server_app(_experiment)
client_app = make_client_app(_experiment)
