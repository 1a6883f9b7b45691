# deploy/k8s: kustomize renders, schema validation against Kubernetes 1.30,
# 1.33 and 1.37 (kubernetes-validate's strict schemas: unknown fields are
# errors; the ServiceMonitor against tests/deploy/k8s/servicemonitor.schema.json),
# Momentum's policies, and a live run of the built server and agent with the
# rendered arguments (tests/deploy/k8s/check_k8s.py). Needs kubectl (its
# kustomize), openssl, the project's Python (MOMENTUM_PYTHON: PyYAML,
# jsonschema, kubernetes-validate, grpcio) and the built momentum-server,
# momentum-agent and momentum client. scripts/setup.sh installs them; the
# test fails, naming the tool, without, and is skipped when kubectl's
# kustomize is older than v4.5 (Debian 12's own kubectl is 1.20).
add_test(NAME deploy_k8s
  COMMAND ${MOMENTUM_WITH_KUSTOMIZE} ${MOMENTUM_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/k8s/check_k8s.py
    --source-dir ${PROJECT_SOURCE_DIR}
    --binary-dir ${PROJECT_BINARY_DIR}
    --python ${MOMENTUM_PYTHON})
# About 6 s.
set_tests_properties(deploy_k8s PROPERTIES TIMEOUT 120 LABELS deploy
  SKIP_RETURN_CODE 77)
