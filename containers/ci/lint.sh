#!/usr/bin/env bash
# The deployment's static checks (the same as tests/test_deploy_lint.py, for humans):
# playbook syntax, ansible-lint (production profile), yamllint, kubernetes-validate
# --strict, hadolint. Tools from $FACEHUB_LINT_VENV (containers/ci/install-deps.sh).
set -euo pipefail

cd "$(dirname "$0")/../.."
bin=${FACEHUB_LINT_VENV:-/tmp/lintvenv}/bin
export ANSIBLE_CONFIG=$PWD/ansible.cfg PATH="$bin:$PATH"

for playbook in ansible/*.yml; do
    ansible-playbook --syntax-check "$playbook"
done
ansible-lint --profile production --offline
yamllint --strict .
for version in 1.33.0 1.37.0; do
    kubernetes-validate --strict --quiet --kubernetes-version "$version" \
        containers/k8s/*.yaml containers/k8s-fleet/*.yaml containers/k8s-cloud/*.yaml
done
find containers -type f \( -name 'Dockerfile*' -o -name 'Containerfile*' \) -print0 |
    xargs -0 -n1 hadolint --config .hadolint.yaml
echo "lint: all deployment checks passed"
