"""The VPC (or the one config names) and the security groups between the load balancer, the four
services, the database and the journal's file system."""

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws
from deploy_config import PROJECT, DeployConfig

AZ_COUNT = 2
HTTP_PORT = 80
WEBSERVER_PORT = 3000
POSTGRES_PORT = 5432
NFS_PORT = 2049


@dataclass(frozen=True)
class Network:
    vpc_id: pulumi.Input[str]
    public_subnet_ids: Sequence[pulumi.Input[str]]
    private_subnet_ids: Sequence[pulumi.Input[str]]


@dataclass(frozen=True)
class SecurityGroups:
    load_balancer: aws.ec2.SecurityGroup
    services: aws.ec2.SecurityGroup  # the four ECS services share it
    database: aws.ec2.SecurityGroup
    file_system: aws.ec2.SecurityGroup


def network(config: DeployConfig) -> Network:
    if config.vpc_id:
        return Network(config.vpc_id, config.public_subnet_ids, config.private_subnet_ids)
    return _own_vpc(config)


def _own_vpc(config: DeployConfig) -> Network:
    """Two public subnets (load balancer, NAT) and two private ones (tasks, database, EFS).

    The tasks reach AWS's APIs (SQS, ECS, ECR, Secrets Manager, CloudWatch Logs) through a NAT
    gateway, not interface endpoints: those six endpoints cost about $88 a month in two AZs before
    any traffic, one NAT gateway about $33 plus $0.045/GB. The free S3 gateway endpoint carries the
    bulky traffic (image layers, step outputs) past the NAT. `natGatewayPerAz` (prod) adds a NAT in
    the second AZ so that losing one AZ does not cut the other off from AWS.
    """
    prefix = f'{PROJECT}-{config.env}'
    zones = aws.get_availability_zones_output(state='available').names
    blocks = list(ipaddress.ip_network(config.vpc_cidr).subnets(prefixlen_diff=4))
    vpc = aws.ec2.Vpc(
        'vpc',
        cidr_block=config.vpc_cidr,
        enable_dns_support=True,
        enable_dns_hostnames=True,  # EFS mount targets are reached by name
        tags={'Name': prefix},
    )
    gateway = aws.ec2.InternetGateway('internet', vpc_id=vpc.id, tags={'Name': prefix})
    public_routes = aws.ec2.RouteTable(
        'public',
        vpc_id=vpc.id,
        routes=[{'cidr_block': '0.0.0.0/0', 'gateway_id': gateway.id}],
        tags={'Name': f'{prefix}-public'},
    )
    public = [
        _subnet(f'public-{i}', vpc, str(blocks[i]), zones[i], public_routes)
        for i in range(AZ_COUNT)
    ]
    nats = [
        aws.ec2.NatGateway(
            f'nat-{i}',
            allocation_id=aws.ec2.Eip(f'nat-{i}', domain='vpc').id,
            subnet_id=public[i].id,
            tags={'Name': f'{prefix}-{i}'},
        )
        for i in range(AZ_COUNT if config.nat_gateway_per_az else 1)
    ]
    private_routes = [
        aws.ec2.RouteTable(
            f'private-{i}',
            vpc_id=vpc.id,
            routes=[{'cidr_block': '0.0.0.0/0', 'nat_gateway_id': nats[i % len(nats)].id}],
            tags={'Name': f'{prefix}-private-{i}'},
        )
        for i in range(AZ_COUNT)
    ]
    private = [
        _subnet(f'private-{i}', vpc, str(blocks[AZ_COUNT + i]), zones[i], private_routes[i])
        for i in range(AZ_COUNT)
    ]
    aws.ec2.VpcEndpoint(
        's3',
        vpc_id=vpc.id,
        service_name=f'com.amazonaws.{config.region}.s3',
        vpc_endpoint_type='Gateway',
        route_table_ids=[table.id for table in private_routes],
    )
    return Network(vpc.id, [s.id for s in public], [s.id for s in private])


def _subnet(
    name: str,
    vpc: aws.ec2.Vpc,
    cidr: str,
    zone: pulumi.Input[str],
    routes: aws.ec2.RouteTable,
) -> aws.ec2.Subnet:
    subnet = aws.ec2.Subnet(
        name, vpc_id=vpc.id, cidr_block=cidr, availability_zone=zone, tags={'Name': name}
    )
    aws.ec2.RouteTableAssociation(name, subnet_id=subnet.id, route_table_id=routes.id)
    return subnet


def security_groups(config: DeployConfig, net: Network) -> SecurityGroups:
    """Only the UI's CIDR reaches the load balancer, only the load balancer reaches the webserver,
    only the services reach the database and the file system."""

    def group(name: str, description: str) -> aws.ec2.SecurityGroup:
        return aws.ec2.SecurityGroup(
            name,
            name=f'{PROJECT}-{config.env}-{name}',
            description=description,
            vpc_id=net.vpc_id,
        )

    groups = SecurityGroups(
        load_balancer=group('load-balancer', 'The Dagster UI load balancer'),
        services=group('services', 'The dagster-taskiq ECS services'),
        database=group('database', 'The dagster-taskiq PostgreSQL'),
        file_system=group('file-system', "The workers' journal (EFS)"),
    )
    ingress = aws.vpc.SecurityGroupIngressRule
    ingress(
        'ui-to-load-balancer',
        security_group_id=groups.load_balancer.id,
        cidr_ipv4=config.ui_allowed_cidr,
        ip_protocol='tcp',
        from_port=HTTP_PORT,
        to_port=HTTP_PORT,
    )
    aws.vpc.SecurityGroupEgressRule(
        'load-balancer-to-webserver',
        security_group_id=groups.load_balancer.id,
        referenced_security_group_id=groups.services.id,
        ip_protocol='tcp',
        from_port=WEBSERVER_PORT,
        to_port=WEBSERVER_PORT,
    )
    for name, source, target, port in [
        ('load-balancer-to-services', groups.load_balancer, groups.services, WEBSERVER_PORT),
        ('services-to-database', groups.services, groups.database, POSTGRES_PORT),
        ('services-to-file-system', groups.services, groups.file_system, NFS_PORT),
    ]:
        ingress(
            name,
            security_group_id=target.id,
            referenced_security_group_id=source.id,
            ip_protocol='tcp',
            from_port=port,
            to_port=port,
        )
    # Steps run user code that may call anything; AWS's APIs are reached through the NAT
    aws.vpc.SecurityGroupEgressRule(
        'services-out',
        security_group_id=groups.services.id,
        cidr_ipv4='0.0.0.0/0',
        ip_protocol='-1',
    )
    return groups


@dataclass(frozen=True)
class Entry:
    """The Dagster UI's way in: an internet-facing load balancer in front of the webserver."""

    load_balancer: aws.lb.LoadBalancer
    target_group: aws.lb.TargetGroup
    listener: aws.lb.Listener


def load_balancer(config: DeployConfig, net: Network, groups: SecurityGroups) -> Entry:
    """HTTP on port 80 to the webserver's port 3000, from `uiAllowedCidr` only."""
    prefix = f'{PROJECT}-{config.env}'
    load_balancer = aws.lb.LoadBalancer(
        'webserver',
        name=prefix,
        internal=False,
        load_balancer_type='application',
        security_groups=[groups.load_balancer.id],
        subnets=net.public_subnet_ids,
        drop_invalid_header_fields=True,
    )
    target_group = aws.lb.TargetGroup(
        'webserver',
        name=f'{prefix}-web',
        port=WEBSERVER_PORT,
        protocol='HTTP',
        target_type='ip',
        vpc_id=net.vpc_id,
        deregistration_delay=30,
        health_check={'path': '/server_info', 'matcher': '200'},
    )
    listener = aws.lb.Listener(
        'webserver',
        load_balancer_arn=load_balancer.arn,
        port=80,
        protocol='HTTP',
        default_actions=[{'type': 'forward', 'target_group_arn': target_group.arn}],
    )
    return Entry(load_balancer, target_group, listener)
