# deploy/k8s: kustomize renders, Kubernetes 1.30 schema validation, Momentum's
# policies, and a live run of the built server and agent with the rendered
# arguments (tests/deploy/k8s/check.js). Needs kubectl (its kustomize), node,
# npm (the check runs `npm ci` in tests/deploy/k8s when node_modules is stale),
# openssl, and the built momentum-server, momentum-agent and momentum client.
# scripts/setup.sh installs them; the test fails, naming the tool, without,
# and is skipped when kubectl's kustomize is older than v4.5 (Debian 12's
# own kubectl is 1.20).
add_test(NAME deploy_k8s
  COMMAND ${MOMENTUM_WITH_KUSTOMIZE} ${MOMENTUM_NODE} ${CMAKE_CURRENT_SOURCE_DIR}/k8s/check.js
    --source-dir ${PROJECT_SOURCE_DIR}
    --binary-dir ${PROJECT_BINARY_DIR}
    --python ${MOMENTUM_PYTHON})
# About 3 s once node_modules is there; the first run adds `npm ci`.
set_tests_properties(deploy_k8s PROPERTIES TIMEOUT 120 LABELS deploy
  SKIP_RETURN_CODE 77)
