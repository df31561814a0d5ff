"""The Pulumi program's modules (deploy/ is a Pulumi program folder, not a package)."""

import sys
import warnings
from pathlib import Path

DEPLOY_DIR = Path(__file__).resolve().parents[2] / 'deploy'
sys.path.insert(0, str(DEPLOY_DIR))

with warnings.catch_warnings():
    # pulumi-aws 7 loads its ec2 module on first use and then warns about a deprecated resource of
    # its own (EncryptionControl), which the program does not use; warnings are errors in tests
    warnings.filterwarnings('ignore', 'aws.ec2/encryptioncontrol', DeprecationWarning)
    from pulumi_aws.ec2 import Vpc  # noqa: F401

    # likewise its s3 module, about the V2 aliases of the resources the program uses (s3.Bucket...)
    warnings.filterwarnings('ignore', r'(aws\.s3/\w+v2\.|s3\.BucketV2 )', DeprecationWarning)
    from pulumi_aws.s3 import Bucket  # noqa: F401
