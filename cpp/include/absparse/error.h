// Error reporting for the absparse C++ API.
//
// Every argument error is an absparse::InvalidArgument, derived from std::invalid_argument so that
// pybind11 turns it into Python's ValueError. Messages name the function, the argument, the expected
// and the actual value; the file and line of the check are appended for bug reports.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace absparse {

class InvalidArgument : public std::invalid_argument {
 public:
  // `file` is reduced to its base name: messages name the check, not the build machine's paths.
  InvalidArgument(const std::string& function, const std::string& message, const char* file,
                  int line)
      : std::invalid_argument(function + ": " + message + " [" + base_name(file) + ":" +
                              std::to_string(line) + "]") {}

 private:
  static std::string base_name(const char* path) {
    const std::string p(path);
    const size_t slash = p.find_last_of("/\\");
    return slash == std::string::npos ? p : p.substr(slash + 1);
  }
};

namespace detail {
// Streams all arguments into one string: concat("expected ", 4, ", got ", 3).
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace absparse

// ABSPARSE_CHECK_ARG(cond, function, message parts...): throws InvalidArgument when cond is false.
#define ABSPARSE_CHECK_ARG(cond, function, ...)                                              \
  do {                                                                                       \
    if (!(cond)) {                                                                           \
      throw ::absparse::InvalidArgument((function), ::absparse::detail::concat(__VA_ARGS__), \
                                        __FILE__, __LINE__);                                 \
    }                                                                                        \
  } while (0)
