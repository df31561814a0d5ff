"""The Pulumi program (deploy/) built under Pulumi's mocks: no CLI, no account, no network.

The mocks record every resource's inputs (and the monitor every resource's ignoreChanges) as the
engine would receive them; the tests read those records and the stack's outputs.
"""

import json
import runpy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import infra
import pulumi
import pytest
import yaml
from deploy_config import CONFIG_KEYS, PROJECT, DeployConfig, TaskSize, load_config
from pulumi.runtime.mocks import MockMonitor

DEPLOY_DIR = Path(infra.__file__).parent
ACCOUNT = '123456789012'
REGION = 'us-east-1'
ZONES = ['us-east-1a', 'us-east-1b', 'us-east-1c']
DATABASE_PASSWORD = 'mockpassword' * 2
SIGNING_KEY_HEX = 'ab' * 32
ALB_DNS = 'dagster-taskiq-dev-1234567890.us-east-1.elb.amazonaws.com'
DEV = DeployConfig(env='dev', region=REGION, ui_allowed_cidr='203.0.113.0/24')
PROD = DeployConfig(
    env='prod',
    region=REGION,
    ui_allowed_cidr='198.51.100.0/24',
    nat_gateway_per_az=True,
    db_instance_class='db.m7g.large',
    db_multi_az=True,
    protect_data=True,
)
# How Pulumi's wire format marks a secret value (the engine encrypts it in the state)
SECRET = {'4dabf18193072939515e22adb298388d': '1b47061264138c4ac30d75fd1eb44270'}
ECR_TOKEN = 'ecr:GetAuthorizationToken'
# What Pulumi's auto-naming makes of the step outputs bucket's resource name
OUTPUTS_BUCKET = 'step-outputs-1a2b3c4'
OUTPUTS_BUCKET_ARN = f'arn:aws:s3:::{OUTPUTS_BUCKET}'
OUTPUT_OBJECTS = f'{OUTPUTS_BUCKET_ARN}/demo/*'  # the IO manager's objects (prefix demo)
LIST_TASKS = 'ecs:ListTasks'


def arn(service: str, resource: str) -> str:
    return f'arn:aws:{service}:{REGION}:{ACCOUNT}:{resource}'


def mocked_state(typ: str, name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """What AWS would report for a resource: plausible ids, ARNs, URLs."""
    named = inputs.get('name', name)
    if typ == 'aws:sqs/queue:Queue':
        url = f'https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/{named}'
        return {'id': url, 'url': url, 'arn': arn('sqs', named)}
    if typ == 'aws:ecs/service:Service':
        cluster = inputs['cluster'].rsplit('/', 1)[-1]
        return {'arn': arn('ecs', f'service/{cluster}/{named}')}
    if typ == 'aws:s3/bucket:Bucket':
        bucket = f'{name}-1a2b3c4'
        return {'id': bucket, 'bucket': bucket, 'arn': f'arn:aws:s3:::{bucket}'}
    states = {
        'aws:ec2/securityGroup:SecurityGroup': {'id': f'sg-{name}'},
        'aws:ecs/cluster:Cluster': {'arn': arn('ecs', f'cluster/{named}')},
        'aws:cloudwatch/logGroup:LogGroup': {'arn': arn('logs', f'log-group:{named}')},
        'aws:ecr/repository:Repository': {
            'arn': arn('ecr', f'repository/{named}'),
            'repositoryUrl': f'{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/{named}',
        },
        'aws:secretsmanager/secret:Secret': {
            'arn': arn('secretsmanager', f'secret:{named}-AbCdEf')
        },
        'aws:efs/fileSystem:FileSystem': {
            'id': 'fs-0123456789abcdef0',
            'arn': arn('elasticfilesystem', 'file-system/fs-0123456789abcdef0'),
        },
        'aws:efs/accessPoint:AccessPoint': {
            'id': 'fsap-0123456789abcdef0',
            'arn': arn('elasticfilesystem', 'access-point/fsap-0123456789abcdef0'),
        },
        'aws:iam/role:Role': {'arn': f'arn:aws:iam::{ACCOUNT}:role/{named}'},
        'aws:lb/loadBalancer:LoadBalancer': {
            'arn': arn('elasticloadbalancing', f'loadbalancer/app/{named}/50dc6c495c0c9188'),
            'dnsName': ALB_DNS,
        },
        'aws:rds/instance:Instance': {'address': 'db.internal', 'port': 5432},
        'random:index/randomPassword:RandomPassword': {'result': DATABASE_PASSWORD},
        'random:index/randomBytes:RandomBytes': {'hex': SIGNING_KEY_HEX},
    }
    return states.get(typ, {'arn': arn('mock', f'{typ}/{name}')})


@dataclass(frozen=True)
class Registered:
    typ: str
    name: str
    inputs: dict[str, Any]


class RecordingMocks(pulumi.runtime.Mocks):
    def __init__(self) -> None:
        self.resources: list[Registered] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.resources.append(Registered(args.typ, args.name, args.inputs))
        state = {**args.inputs, **mocked_state(args.typ, args.name, args.inputs)}
        return state.pop('id', f'{args.name}-id'), state

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        if args.token == 'aws:index/getCallerIdentity:getCallerIdentity':
            return {'accountId': ACCOUNT, 'arn': f'arn:aws:iam::{ACCOUNT}:user/ci', 'userId': 'ci'}
        if args.token == 'aws:index/getAvailabilityZones:getAvailabilityZones':
            return {'id': REGION, 'names': ZONES, 'zoneIds': ['use1-az1', 'use1-az2', 'use1-az4']}
        raise AssertionError(f'unexpected call {args.token}')


class RecordingMonitor(MockMonitor):
    """Keeps each resource's ignoreChanges, which Mocks.new_resource does not see."""

    def __init__(self, mocks: RecordingMocks) -> None:
        super().__init__(mocks)
        self.ignore_changes: dict[tuple[str, str], list[str]] = {}

    def RegisterResource(self, request: Any) -> Any:  # gRPC's name
        self.ignore_changes[(request.type, request.name)] = list(request.ignoreChanges)
        return super().RegisterResource(request)


@dataclass(frozen=True)
class Built:
    resources: list[Registered]
    ignore_changes: dict[tuple[str, str], list[str]]
    outputs: dict[str, Any]

    def of_type(self, typ: str) -> dict[str, dict[str, Any]]:
        return {r.name: r.inputs for r in self.resources if r.typ == typ}

    def one(self, typ: str, name: str) -> dict[str, Any]:
        return self.of_type(typ)[name]

    def container(self, service: str) -> dict[str, Any]:
        task = self.one('aws:ecs/taskDefinition:TaskDefinition', service)
        [container] = json.loads(task['containerDefinitions'])
        return container

    def policies(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every IAM policy document the program creates: trust and permission policies."""
        for name, inputs in self.of_type('aws:iam/role:Role').items():
            yield f'{name} (trust)', json.loads(inputs['assumeRolePolicy'])
        for name, inputs in self.of_type('aws:iam/rolePolicy:RolePolicy').items():
            yield name, json.loads(inputs['policy'])
        for r in self.resources:
            if r.typ not in ('aws:iam/role:Role', 'aws:iam/rolePolicy:RolePolicy'):
                assert 'policy' not in r.inputs, f'{r.typ} {r.name} has a policy to check'

    def statements(self, role: str) -> list[dict[str, Any]]:
        statements = json.loads(self.one('aws:iam/rolePolicy:RolePolicy', role)['policy'])
        return statements['Statement']


def build_stack(config: DeployConfig) -> Built:
    mocks = RecordingMocks()
    monitor = RecordingMonitor(mocks)
    pulumi.runtime.set_mocks(mocks, project=PROJECT, stack=config.env, monitor=monitor)
    outputs: dict[str, Any] = {}

    @pulumi.runtime.test
    def program() -> pulumi.Output[None]:
        return pulumi.Output.all(**infra.build(config).outputs).apply(outputs.update)

    program()  # returns once every resource is registered and every output resolved
    return Built(mocks.resources, monitor.ignore_changes, outputs)


@pytest.fixture(scope='module')
def dev() -> Built:
    return build_stack(DEV)


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def actions(statements: list[dict[str, Any]]) -> set[str]:
    return {action for s in statements for action in as_list(s['Action'])}


def resources_for(statements: list[dict[str, Any]], action: str) -> set[str]:
    return {
        resource
        for s in statements
        if action in as_list(s['Action'])
        for resource in as_list(s['Resource'])
    }


def queue_arn(name: str) -> str:
    return arn('sqs', name)


STEP, RETRY, DLQ = (
    queue_arn('dagster-taskiq-steps'),
    queue_arn('dagster-taskiq-steps-retry'),
    queue_arn('dagster-taskiq-steps-dlq'),
)


def test_three_queues_and_both_work_queues_redrive_to_the_dlq(dev: Built) -> None:
    queues = {q['name']: q for q in dev.of_type('aws:sqs/queue:Queue').values()}
    assert set(queues) == {
        'dagster-taskiq-steps',
        'dagster-taskiq-steps-retry',
        'dagster-taskiq-steps-dlq',
    }
    for name in ('dagster-taskiq-steps', 'dagster-taskiq-steps-retry'):
        redrive = json.loads(queues[name]['redrivePolicy'])
        assert redrive == {'deadLetterTargetArn': DLQ, 'maxReceiveCount': 10}
        assert queues[name]['visibilityTimeoutSeconds'] == 60
    assert 'redrivePolicy' not in queues['dagster-taskiq-steps-dlq']


def test_a_log_group_per_service(dev: Built) -> None:
    groups = dev.of_type('aws:cloudwatch/logGroup:LogGroup').values()
    expected = {f'/aws/ecs/{service}-dev' for service in infra.SERVICES}
    assert {g['name'] for g in groups} == expected
    assert {g['retentionInDays'] for g in groups} == {14}
    assert set(dev.outputs['logGroups'].values()) == expected
    for service in infra.SERVICES:
        logging = dev.container(service)['logConfiguration']
        assert logging['logDriver'] == 'awslogs'
        assert logging['options']['awslogs-group'] == f'/aws/ecs/{service}-dev'


def test_four_fargate_services_in_the_cluster(dev: Built) -> None:
    services = dev.of_type('aws:ecs/service:Service')
    assert {s['name'] for s in services.values()} == {
        'dagster-webserver',
        'dagster-daemon',
        'taskiq-worker',
        'auto-scaler',
    }
    [cluster] = dev.of_type('aws:ecs/cluster:Cluster').values()
    assert cluster['name'] == 'dagster-taskiq-dev'
    for service in services.values():
        assert service['cluster'] == arn('ecs', 'cluster/dagster-taskiq-dev')
        assert service['launchType'] == 'FARGATE'
        assert service['networkConfiguration']['assignPublicIp'] is False


def test_one_image_whose_entry_point_takes_the_role(dev: Built) -> None:
    image = f'{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/dagster-taskiq:latest'
    commands = {service: dev.container(service)['command'] for service in infra.SERVICES}
    assert commands == {
        'dagster-webserver': ['webserver'],
        'dagster-daemon': ['daemon'],
        'taskiq-worker': ['worker'],
        'auto-scaler': ['autoscaler'],
    }
    assert {dev.container(service)['image'] for service in infra.SERVICES} == {image}


def test_the_auto_scaler_owns_the_worker_count(dev: Built) -> None:
    services = dev.of_type('aws:ecs/service:Service')
    assert services['taskiq-worker']['desiredCount'] == 0
    ignored = {name: dev.ignore_changes[('aws:ecs/service:Service', name)] for name in services}
    assert ignored == {
        'taskiq-worker': ['desiredCount'],
        'dagster-webserver': [],
        'dagster-daemon': [],
        'auto-scaler': [],
    }


def test_the_worker_drains_reports_health_and_journals_on_efs(dev: Built) -> None:
    worker = dev.container('taskiq-worker')
    environment = {e['name']: e['value'] for e in worker['environment']}
    assert worker['stopTimeout'] == 120
    command = worker['healthCheck']['command']
    assert command[:3] == ['CMD', 'python', '-c']
    assert "urlopen('http://127.0.0.1:9090/healthz', timeout=3)" in command[3]
    assert environment['DAGSTER_TASKIQ_METRICS_PORT'] == '9090'
    [mount] = worker['mountPoints']
    assert mount['containerPath'] == environment['DAGSTER_TASKIQ_JOURNAL_DIR']
    assert mount['containerPath'] == '/var/lib/dagster-taskiq/journal'
    [volume] = dev.one('aws:ecs/taskDefinition:TaskDefinition', 'taskiq-worker')['volumes']
    assert volume['name'] == mount['sourceVolume']
    efs = volume['efsVolumeConfiguration']
    assert efs['fileSystemId'] == 'fs-0123456789abcdef0'
    assert efs['transitEncryption'] == 'ENABLED'
    assert efs['authorizationConfig'] == {
        'accessPointId': 'fsap-0123456789abcdef0',
        'iam': 'ENABLED',
    }


def test_secrets_reach_containers_only_through_ecs_secrets(dev: Built) -> None:
    database_secret = arn('secretsmanager', 'secret:dagster-taskiq/dev/database-AbCdEf')
    key_secret = arn('secretsmanager', 'secret:dagster-taskiq/dev/signing-key-AbCdEf')
    for service in infra.SERVICES:
        container = dev.container(service)
        text = json.dumps(container)
        assert DATABASE_PASSWORD not in text and SIGNING_KEY_HEX not in text
        environment = {e['name'] for e in container['environment']}
        assert not environment & {
            'DATABASE_URL',
            'DAGSTER_TASKIQ_DATABASE_URL',
            'DAGSTER_TASKIQ_SIGNING_KEY',
        }
        secrets = {s['name']: s['valueFrom'] for s in container['secrets']}
        assert secrets['DATABASE_URL'] == f'{database_secret}:url::'
        if service == 'auto-scaler':
            assert 'DAGSTER_TASKIQ_SIGNING_KEY' not in secrets
        else:
            assert secrets['DAGSTER_TASKIQ_SIGNING_KEY'] == key_secret
    versions = dev.of_type('aws:secretsmanager/secretVersion:SecretVersion')
    stored = json.loads(secret_value(versions['database']['secretString']))
    assert stored['url'] == (
        f'postgresql+psycopg2://dagster:{DATABASE_PASSWORD}@db.internal:5432/dagster'
        '?sslmode=require'
    )
    assert secret_value(versions['signing-key']['secretString']) == SIGNING_KEY_HEX
    password = dev.one('aws:rds/instance:Instance', 'database')['password']
    assert secret_value(password) == DATABASE_PASSWORD


def secret_value(wrapped: Any) -> Any:
    """The value of an input Pulumi keeps secret; fails for a plain one."""
    assert isinstance(wrapped, dict) and wrapped.items() >= SECRET.items(), 'not a secret'
    return wrapped['value']


def test_the_containers_get_the_projects_settings(dev: Built) -> None:
    common = {
        'DAGSTER_TASKIQ_QUEUE_NAME': 'dagster-taskiq-steps',
        'DAGSTER_TASKIQ_AWS_REGION': REGION,
        'DAGSTER_TASKIQ_ECS_CLUSTER': 'dagster-taskiq-dev',
        'DAGSTER_TASKIQ_WORKER_SERVICE': 'taskiq-worker',
    }
    for service in infra.SERVICES:
        environment = {e['name']: e['value'] for e in dev.container(service)['environment']}
        assert environment.items() >= common.items()
    scaler = {e['name']: e['value'] for e in dev.container('auto-scaler')['environment']}
    assert scaler['DAGSTER_TASKIQ_MIN_WORKERS'] == '0'
    assert scaler['DAGSTER_TASKIQ_MAX_WORKERS'] == '10'
    assert scaler['DAGSTER_TASKIQ_TARGET_BACKLOG_PER_WORKER'] == '4'
    worker = {e['name']: e['value'] for e in dev.container('taskiq-worker')['environment']}
    assert worker['DAGSTER_TASKIQ_CONCURRENCY'] == '4'


def test_no_policy_has_a_wildcard_but_the_two_aws_requires(dev: Built) -> None:
    """Actions are never wildcards. Resource "*" only for the two actions that take no resource:
    ecr:GetAuthorizationToken (alone in its statement) and ecs:ListTasks (alone, held to the
    cluster by a condition). In an ARN, "*" only as the streams of one of our log groups or as the
    objects under demo/ of the step outputs bucket (exactly `<bucket arn>/demo/*`)."""
    log_groups = {arn('logs', f'log-group:/aws/ecs/{s}-dev') for s in infra.SERVICES}
    documents = dict(dev.policies())
    assert len(documents) == 2 * 5  # five roles (execution + four tasks), trust + permissions
    unscoped = []
    for name, document in documents.items():
        for statement in document['Statement']:
            assert statement['Effect'] == 'Allow', name
            assert not any('*' in action for action in as_list(statement['Action'])), name
            for resource in as_list(statement.get('Resource', [])):
                if resource == '*':
                    unscoped.append(statement)
                elif resource.endswith(':*'):
                    assert resource[:-2] in log_groups, resource
                elif '*' in resource:
                    assert resource == OUTPUT_OBJECTS, resource
    assert unscoped == [
        {'Effect': 'Allow', 'Action': [ECR_TOKEN], 'Resource': ['*']},
        {
            'Effect': 'Allow',
            'Action': [LIST_TASKS],
            'Resource': ['*'],
            'Condition': {'ArnEquals': {'ecs:cluster': arn('ecs', 'cluster/dagster-taskiq-dev')}},
        },
    ]
    assert resources_for(dev.statements('execution'), ECR_TOKEN) == {'*'}
    assert resources_for(dev.statements('auto-scaler'), LIST_TASKS) == {'*'}


def test_the_execution_role_reads_its_image_log_groups_and_two_secrets(dev: Built) -> None:
    statements = dev.statements('execution')
    assert resources_for(statements, 'secretsmanager:GetSecretValue') == {
        arn('secretsmanager', 'secret:dagster-taskiq/dev/database-AbCdEf'),
        arn('secretsmanager', 'secret:dagster-taskiq/dev/signing-key-AbCdEf'),
    }
    assert resources_for(statements, 'ecr:BatchGetImage') == {
        arn('ecr', 'repository/dagster-taskiq')
    }
    assert resources_for(statements, 'logs:PutLogEvents') == {
        arn('logs', f'log-group:/aws/ecs/{s}-dev:*') for s in infra.SERVICES
    }
    assert actions(statements) == {
        'ecr:BatchCheckLayerAvailability',
        'ecr:BatchGetImage',
        'ecr:GetDownloadUrlForLayer',
        ECR_TOKEN,
        'logs:CreateLogStream',
        'logs:PutLogEvents',
        'secretsmanager:GetSecretValue',
    }


def test_the_worker_role_consumes_sends_only_to_its_queues_and_has_no_ecs(dev: Built) -> None:
    statements = dev.statements('taskiq-worker')
    assert resources_for(statements, 'sqs:SendMessage') <= {STEP, RETRY, DLQ}
    assert DLQ in resources_for(statements, 'sqs:SendMessage')
    for action in ('sqs:ReceiveMessage', 'sqs:DeleteMessage', 'sqs:ChangeMessageVisibility'):
        assert resources_for(statements, action) == {STEP, RETRY}
    assert not [action for action in actions(statements) if action.startswith('ecs:')]
    assert actions(statements) == {
        'sqs:ReceiveMessage',
        'sqs:DeleteMessage',
        'sqs:ChangeMessageVisibility',
        'sqs:GetQueueUrl',
        'sqs:GetQueueAttributes',
        'sqs:SendMessage',
        'logs:CreateLogStream',
        'logs:PutLogEvents',
        'elasticfilesystem:ClientMount',
        'elasticfilesystem:ClientWrite',
        's3:GetObject',
        's3:PutObject',
        's3:ListBucket',
    }
    assert resources_for(statements, 'logs:PutLogEvents') == {
        arn('logs', 'log-group:/aws/ecs/taskiq-worker-dev:*')
    }
    [efs] = [s for s in statements if 'elasticfilesystem:ClientMount' in s['Action']]
    assert efs['Resource'] == [arn('elasticfilesystem', 'file-system/fs-0123456789abcdef0')]
    assert efs['Condition'] == {
        'StringEquals': {
            'elasticfilesystem:AccessPointArn': arn(
                'elasticfilesystem', 'access-point/fsap-0123456789abcdef0'
            )
        }
    }


def test_only_the_worker_role_has_s3_and_only_on_the_step_outputs_prefix(dev: Built) -> None:
    s3 = [
        statement
        for statement in dev.statements('taskiq-worker')
        if any(action.startswith('s3:') for action in as_list(statement['Action']))
    ]
    assert s3 == [
        {
            'Effect': 'Allow',
            'Action': ['s3:GetObject', 's3:PutObject'],
            'Resource': [OUTPUT_OBJECTS],
        },
        {
            'Effect': 'Allow',
            'Action': ['s3:ListBucket'],
            'Resource': [OUTPUTS_BUCKET_ARN],
            # the IO manager lists once with Prefix 'demo' (no slash) when it starts
            'Condition': {'StringLike': {'s3:prefix': ['demo', 'demo/*']}},
        },
    ]
    for name, document in dev.policies():
        if name != 'taskiq-worker':
            statements = document['Statement']
            assert not [action for action in actions(statements) if action.startswith('s3:')], name
            assert 'arn:aws:s3' not in json.dumps(document), name


def test_the_step_outputs_bucket_is_private_encrypted_and_expires(dev: Built) -> None:
    bucket = dev.one('aws:s3/bucket:Bucket', 'step-outputs')
    assert not bucket.keys() & {'bucket', 'bucketPrefix'}  # named by Pulumi: names are global
    assert bucket['forceDestroy'] is True  # dev does not protect data
    block = dev.one('aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock', 'step-outputs')
    assert block == {
        'bucket': OUTPUTS_BUCKET,
        'blockPublicAcls': True,
        'blockPublicPolicy': True,
        'ignorePublicAcls': True,
        'restrictPublicBuckets': True,
    }
    encryption = dev.one(
        'aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration',
        'step-outputs',
    )
    assert encryption['bucket'] == OUTPUTS_BUCKET
    assert encryption['rules'] == [
        {'applyServerSideEncryptionByDefault': {'sseAlgorithm': 'AES256'}}
    ]
    lifecycle = dev.one(
        'aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration', 'step-outputs'
    )
    assert lifecycle['bucket'] == OUTPUTS_BUCKET
    [rule] = lifecycle['rules']
    assert (rule['status'], rule['filter'], rule['expiration']) == (
        'Enabled',
        {'prefix': 'demo/'},
        {'days': 14},
    )
    assert rule['abortIncompleteMultipartUpload'] == {'daysAfterInitiation': 1}


def test_the_outputs_retention_is_a_setting() -> None:
    config = DeployConfig(
        env='dev', region=REGION, ui_allowed_cidr='203.0.113.0/24', outputs_retention_days=3
    )
    lifecycle = build_stack(config).one(
        'aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration', 'step-outputs'
    )
    assert [rule['expiration'] for rule in lifecycle['rules']] == [{'days': 3}]
    with pytest.raises(ValueError, match='outputsRetentionDays'):
        DeployConfig(
            env='dev', region=REGION, ui_allowed_cidr='203.0.113.0/24', outputs_retention_days=0
        )


def test_the_code_location_gets_the_step_outputs_bucket(dev: Built) -> None:
    """The demo's IO manager uses S3 when DAGSTER_TASKIQ_DEMO_S3_BUCKET is set: the worker runs
    the steps; the webserver and daemon load the same code location. Not a secret: plain env."""
    for service in infra.SERVICES:
        container = dev.container(service)
        environment = {e['name']: e['value'] for e in container['environment']}
        if service == 'auto-scaler':
            assert 'DAGSTER_TASKIQ_DEMO_S3_BUCKET' not in environment
        else:
            assert environment['DAGSTER_TASKIQ_DEMO_S3_BUCKET'] == OUTPUTS_BUCKET
        assert 'DAGSTER_TASKIQ_DEMO_S3_BUCKET' not in {s['name'] for s in container['secrets']}


def test_the_run_worker_roles_send_steps_and_retries(dev: Built) -> None:
    for role in ('dagster-daemon', 'dagster-webserver'):
        statements = dev.statements(role)
        assert actions(statements) == {
            'sqs:SendMessage',
            'sqs:GetQueueUrl',
            'sqs:GetQueueAttributes',
        }
        assert resources_for(statements, 'sqs:SendMessage') == {STEP, RETRY}


def test_the_auto_scaler_role_reads_queues_and_sizes_only_the_worker_service(dev: Built) -> None:
    statements = dev.statements('auto-scaler')
    assert actions(statements) == {
        'sqs:GetQueueAttributes',
        'sqs:GetQueueUrl',
        'ecs:DescribeServices',
        'ecs:UpdateService',
        LIST_TASKS,
    }
    worker_service = arn('ecs', 'service/dagster-taskiq-dev/taskiq-worker')
    assert resources_for(statements, 'ecs:UpdateService') == {worker_service}
    assert resources_for(statements, 'ecs:DescribeServices') == {worker_service}
    assert resources_for(statements, 'sqs:GetQueueAttributes') == {STEP, RETRY}


def test_only_the_services_reach_the_database_and_efs_and_only_the_ui_cidr_the_alb(
    dev: Built,
) -> None:
    rules = dev.of_type('aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule')
    by_target = {
        (rule['securityGroupId'], rule['fromPort'], rule['toPort']): rule for rule in rules.values()
    }
    assert set(by_target) == {
        ('sg-load-balancer', 80, 80),
        ('sg-services', 3000, 3000),
        ('sg-database', 5432, 5432),
        ('sg-file-system', 2049, 2049),
    }
    assert by_target[('sg-load-balancer', 80, 80)]['cidrIpv4'] == '203.0.113.0/24'
    assert by_target[('sg-services', 3000, 3000)]['referencedSecurityGroupId'] == (
        'sg-load-balancer'
    )
    for target in (('sg-database', 5432, 5432), ('sg-file-system', 2049, 2049)):
        assert by_target[target]['referencedSecurityGroupId'] == 'sg-services'
        assert 'cidrIpv4' not in by_target[target]
    database = dev.one('aws:rds/instance:Instance', 'database')
    assert database['vpcSecurityGroupIds'] == ['sg-database']
    assert database['publiclyAccessible'] is False
    assert (database['engine'], database['engineVersion']) == ('postgres', '16')
    [load_balancer] = dev.of_type('aws:lb/loadBalancer:LoadBalancer').values()
    assert load_balancer['internal'] is False
    assert load_balancer['securityGroups'] == ['sg-load-balancer']


def test_the_stack_outputs(dev: Built) -> None:
    assert dev.outputs == {
        'queueUrl': f'https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/dagster-taskiq-steps',
        'retryQueueUrl': f'https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/dagster-taskiq-steps-retry',
        'dlqUrl': f'https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/dagster-taskiq-steps-dlq',
        'clusterName': 'dagster-taskiq-dev',
        'ecrRepositoryUrl': f'{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/dagster-taskiq',
        'webserverUrl': f'http://{ALB_DNS}',
        'databaseSecretArn': arn('secretsmanager', 'secret:dagster-taskiq/dev/database-AbCdEf'),
        'signingKeySecretArn': arn(
            'secretsmanager', 'secret:dagster-taskiq/dev/signing-key-AbCdEf'
        ),
        'logGroups': {s: f'/aws/ecs/{s}-dev' for s in infra.SERVICES},
        'outputsBucket': OUTPUTS_BUCKET,
    }


def test_prod_is_larger_redundant_and_protected() -> None:
    prod = build_stack(PROD)
    database = prod.one('aws:rds/instance:Instance', 'database')
    assert database['multiAz'] is True
    assert database['instanceClass'] == 'db.m7g.large'
    assert database['deletionProtection'] is True
    assert database['skipFinalSnapshot'] is False
    assert len(prod.of_type('aws:ec2/natGateway:NatGateway')) == 2
    assert prod.one('aws:s3/bucket:Bucket', 'step-outputs')['forceDestroy'] is False
    dev_database = build_stack(DEV).one('aws:rds/instance:Instance', 'database')
    assert (dev_database['multiAz'], dev_database['deletionProtection']) == (False, False)


def test_existing_subnets_replace_the_vpc() -> None:
    config = DeployConfig(
        env='dev',
        region=REGION,
        ui_allowed_cidr='203.0.113.0/24',
        vpc_id='vpc-1',
        public_subnet_ids=('subnet-p1', 'subnet-p2'),
        private_subnet_ids=('subnet-a', 'subnet-b'),
    )
    built = build_stack(config)
    assert not built.of_type('aws:ec2/vpc:Vpc')
    for service in built.of_type('aws:ecs/service:Service').values():
        assert service['networkConfiguration']['subnets'] == ['subnet-a', 'subnet-b']


def test_prod_refuses_an_open_ui() -> None:
    with pytest.raises(ValueError, match='uiAllowedCidr'):
        DeployConfig(env='prod', region=REGION, ui_allowed_cidr='0.0.0.0/0')


def test_the_program_exports_the_outputs_of_the_dev_stack() -> None:
    """`pulumi up` runs deploy/__main__.py with the stack's config, as here."""
    pulumi.runtime.set_mocks(RecordingMocks(), project=PROJECT, stack='dev')
    pulumi.runtime.set_all_config(stack_config('dev'))

    @pulumi.runtime.test
    def program() -> None:
        runpy.run_path(str(DEPLOY_DIR), run_name='__main__')

    try:
        program()
    finally:
        pulumi.runtime.set_all_config({})
    stack = pulumi.runtime.get_root_resource()
    assert isinstance(stack, pulumi.runtime.stack.Stack)
    assert set(stack.outputs) == {
        'queueUrl',
        'retryQueueUrl',
        'dlqUrl',
        'clusterName',
        'ecrRepositoryUrl',
        'webserverUrl',
        'databaseSecretArn',
        'signingKeySecretArn',
        'logGroups',
        'outputsBucket',
    }


def stack_file(stack: str) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((DEPLOY_DIR / f'Pulumi.{stack}.yaml').read_text())
    return config['config']


def stack_config(stack: str) -> dict[str, str]:
    """A stack file's config as Pulumi hands it to the program: strings, objects as JSON."""
    return {
        key: value if isinstance(value, str) else json.dumps(value)
        for key, value in stack_file(stack).items()
    }


@pytest.mark.parametrize('stack', ['local', 'dev', 'prod'])
def test_each_stack_file_loads(stack: str) -> None:
    values = stack_file(stack)
    pulumi.runtime.set_mocks(RecordingMocks(), project=PROJECT, stack=stack)
    pulumi.runtime.set_all_config(stack_config(stack))
    try:
        config = load_config()
    finally:
        pulumi.runtime.set_all_config({})
    project_keys = {key.split(':', 1)[1] for key in values if key.startswith(f'{PROJECT}:')}
    assert project_keys <= CONFIG_KEYS  # a misspelt key would be ignored
    assert config.env == stack
    assert config.ui_allowed_cidr != '0.0.0.0/0'
    if stack == 'local':
        assert values['aws:skipCredentialsValidation'] is True
        assert values['aws:skipRequestingAccountId'] is True
        [endpoints] = values['aws:endpoints']
        assert set(endpoints.values()) == {'http://127.0.0.1:4566'}
    if stack == 'prod':
        assert (config.db_multi_az, config.protect_data, config.nat_gateway_per_az) == (
            True,
            True,
            True,
        )
        assert config.worker_size == TaskSize(cpu=2048, memory_mib=4096)
    if stack == 'dev':
        assert (config.db_multi_az, config.protect_data) == (False, False)
