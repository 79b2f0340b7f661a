// Error reporting for the absparse C++ API.
//
// Every argument error is an absparse::InvalidArgument, derived from std::invalid_argument so that
// pybind11 turns it into Python's ValueError. Messages name the function, the argument, the expected
// and the actual value; the file and line of the check are appended for bug reports.
#pragma once

#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>

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
// Message assembly without iostreams: std::ostringstream formats numbers through the locale's
// num_put facet, which crashed (SIGSEGV) in a process whose libstdc++ was not the one the
// extension was compiled against (the GPU machine's toolchain, issue 12); std::to_string and
// snprintf("%g") need no facet and print the same text.
inline void append(std::string& out, const std::string& x) { out += x; }
inline void append(std::string& out, const char* x) { out += x; }
inline void append(std::string& out, char x) { out += x; }
inline void append(std::string& out, bool x) { out += x ? '1' : '0'; }
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
inline void append(std::string& out, T x) {
  out += std::to_string(x);
}
inline void append(std::string& out, double x) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%g", x);
  out += buffer;
}
inline void append(std::string& out, float x) { append(out, static_cast<double>(x)); }

// Concatenates all arguments into one string: concat("expected ", 4, ", got ", 3).
template <typename... Args>
std::string concat(const Args&... args) {
  std::string out;
  (append(out, args), ...);
  return out;
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
