// Early-return macros for absl::Status and absl::StatusOr<T>. Debian's abseil
// (20220623) ships neither RETURN_IF_ERROR nor ASSIGN_OR_RETURN, so Momentum
// keeps these two small ones here for every component.
//
// Usage:
//   absl::StatusOr<JobSpec> Load(const std::string& path) {
//     MOMENTUM_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
//     MOMENTUM_RETURN_IF_ERROR(CheckHeader(text));
//     return Parse(text);
//   }
//
// Both work in functions that return absl::Status or any absl::StatusOr<U>
// (an absl::Status converts to either). The status is returned unchanged.
#ifndef MOMENTUM_COMMON_STATUS_MACROS_H_
#define MOMENTUM_COMMON_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace momentum::status_macros_internal {

inline const absl::Status& ToStatus(const absl::Status& status) {
  return status;
}
inline absl::Status ToStatus(absl::Status&& status) {
  return std::move(status);
}
template <typename T>
const absl::Status& ToStatus(const absl::StatusOr<T>& status_or) {
  return status_or.status();
}
template <typename T>
absl::Status ToStatus(absl::StatusOr<T>&& status_or) {
  return std::move(status_or).status();
}

}  // namespace momentum::status_macros_internal

// Evaluates `expr` (an absl::Status or absl::StatusOr<T>) once and returns its
// status from the enclosing function if it is not OK.
#define MOMENTUM_RETURN_IF_ERROR(expr)                      \
  do {                                                      \
    ::absl::Status momentum_status_macros_status =          \
        ::momentum::status_macros_internal::ToStatus(expr); \
    if (!momentum_status_macros_status.ok()) {              \
      return momentum_status_macros_status;                 \
    }                                                       \
  } while (false)

// Evaluates `rexpr` (an absl::StatusOr<T>) once; if it is not OK returns its
// status from the enclosing function, otherwise move-assigns its value to
// `lhs`, which may be a declaration (`std::string text`) or an existing
// variable. A declaration whose type holds a comma (std::pair<int, int> x)
// needs an alias, since the preprocessor splits at the comma. Expands to more
// than one statement: do not use it as the body of an unbraced if or loop.
#define MOMENTUM_ASSIGN_OR_RETURN(lhs, rexpr)                               \
  MOMENTUM_ASSIGN_OR_RETURN_IMPL_(                                          \
      MOMENTUM_STATUS_MACROS_CONCAT_(momentum_status_macros_or_, __LINE__), \
      lhs, rexpr)

#define MOMENTUM_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                    \
  if (!statusor.ok()) {                                       \
    return std::move(statusor).status();                      \
  }                                                           \
  lhs = std::move(statusor).value()

#define MOMENTUM_STATUS_MACROS_CONCAT_INNER_(x, y) x##y
#define MOMENTUM_STATUS_MACROS_CONCAT_(x, y) \
  MOMENTUM_STATUS_MACROS_CONCAT_INNER_(x, y)

#endif  // MOMENTUM_COMMON_STATUS_MACROS_H_
