# deploy/prometheus: the scrape config, the recording and alerting rules and
# their promtool unit tests, checked with promtool (Debian's prometheus
# package) and against docs/metrics.md, so the rules cannot drift from the
# series the coordinator exports; the scrape job's relabelling runs in a real
# Prometheus on the targets Kubernetes pod discovery would give
# (tests/deploy/prometheus/check_prometheus.py says what each check does).
set(_prom_check ${CMAKE_CURRENT_SOURCE_DIR}/prometheus/check_prometheus.py)
foreach(check config relabel rules unit metrics coverage runbooks kustomize)
  set(_wrap)
  if(check STREQUAL "kustomize")
    set(_wrap ${MOMENTUM_WITH_KUSTOMIZE})
  endif()
  add_test(NAME prometheus_${check}
    COMMAND ${_wrap} ${MOMENTUM_PYTHON} ${_prom_check} ${PROJECT_SOURCE_DIR} ${check})
  set_tests_properties(prometheus_${check} PROPERTIES TIMEOUT 60 LABELS deploy)
endforeach()
# Without a kubectl whose kustomize is v4.5 or later the render check
# reports itself skipped (exit 77).
set_tests_properties(prometheus_kustomize PROPERTIES SKIP_RETURN_CODE 77)
# The rules in a real Prometheus scraping the real coordinator: every rule
# healthy, every recording rule equal to its aggregate written out by hand,
# and exactly the failed-job and restart alerts firing for a job whose data
# is missing (about 40 s).
add_test(NAME prometheus_live
  COMMAND ${MOMENTUM_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/prometheus/live_check.py
    ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR})
set_tests_properties(prometheus_live PROPERTIES TIMEOUT 300 LABELS deploy)
