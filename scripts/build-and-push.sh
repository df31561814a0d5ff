#!/usr/bin/env bash
# Build the image, tag it with the git SHA and push it to the ECR repository of the Pulumi stack
# (its `ecrRepositoryUrl` output), or to any registry REGISTRY names.
#   scripts/build-and-push.sh                  # the current Pulumi stack's ECR repository
#   REGISTRY=ghcr.io/me/dagster-taskiq scripts/build-and-push.sh
# Then deploy that tag: `pulumi config set imageTag <sha>` and `pulumi up` (README "Deploy to AWS").
set -euo pipefail
cd "$(dirname "$0")/.."
tag="$(git rev-parse --short=12 HEAD)"
if [ -n "$(git status --porcelain)" ]; then
  tag="$tag-dirty"  # an image of uncommitted code never passes for a commit's
fi
registry="${REGISTRY:-}"
if [ -z "$registry" ]; then
  registry="$(cd deploy && pulumi stack output ecrRepositoryUrl)"
  region="${AWS_REGION:-$(cd deploy && pulumi config get aws:region)}"
  aws ecr get-login-password --region "$region" \
    | docker login --username AWS --password-stdin "${registry%%/*}"
fi
image="$registry:$tag"
docker build --tag "$image" --tag "$registry:latest" .
docker push "$image"
docker push "$registry:latest"
echo "pushed $image"
