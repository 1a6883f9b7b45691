# deploy/grafana: dashboard structure and the kustomize rendering (lint_test.py),
# a strict type check of each dashboard against the models of
# grafana-foundation-sdk 11.6 in the project's Python (check_schema.py:
# unknown fields, wrong types and enum values, missing required fields), and
# every panel query against a real Prometheus scraping a 2-rank job of the
# built server, with deploy/prometheus/rules loaded (live_test.py).
set(_grafana ${CMAKE_CURRENT_SOURCE_DIR}/grafana)
add_test(NAME grafana_lint_test
  COMMAND ${MOMENTUM_WITH_KUSTOMIZE} ${MOMENTUM_PYTHON} ${_grafana}/lint_test.py
    ${PROJECT_SOURCE_DIR})
set_tests_properties(grafana_lint_test PROPERTIES TIMEOUT 60 LABELS deploy
  SKIP_RETURN_CODE 77)
add_test(NAME grafana_schema_test
  COMMAND ${MOMENTUM_PYTHON} ${_grafana}/check_schema.py
    ${PROJECT_SOURCE_DIR}/deploy/grafana/dashboards)
# Well under 1 s.
set_tests_properties(grafana_schema_test PROPERTIES TIMEOUT 60 LABELS deploy)
add_test(NAME grafana_live_test
  COMMAND ${MOMENTUM_PYTHON} ${_grafana}/live_test.py
    ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR})
# About 70 s: a 40 s training run, queried during and after.
set_tests_properties(grafana_live_test PROPERTIES TIMEOUT 600 LABELS deploy)
