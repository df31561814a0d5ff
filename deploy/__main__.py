"""The Pulumi program: `pulumi up -s dev` from this folder (see infra.py)."""

import pulumi
from deploy_config import load_config
from infra import build

for name, value in build(load_config()).outputs.items():
    pulumi.export(name, value)
