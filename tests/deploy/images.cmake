# Container images (deploy/docker/): checked offline, without a Docker engine.
# Stages, pinned base images, COPY --from, non-root USER, ports, that every
# setup.sh call in a Dockerfile is one setup.sh accepts, that the packages of
# every role exist in Debian 12, and, on this tree's binaries, that the
# coordinator's do not load LibTorch, that each image's build packages provide
# the headers and libraries they were built from and its runtime packages what
# they load. Exit 77 (skipped): no apt lists.
add_test(NAME deploy_images
  COMMAND ${MOMENTUM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/images/check_images.py
    ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR})
set_tests_properties(deploy_images PROPERTIES TIMEOUT 60 SKIP_RETURN_CODE 77 LABELS deploy)
