// A tiny assertion helper for the C++ tests: failures are printed and make main() return 1.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace check {

inline int& failures() {
  static int count = 0;
  return count;
}

inline void fail(const char* file, int line, const std::string& what) {
  std::fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, what.c_str());
  ++failures();
}

inline std::vector<std::pair<const char*, std::function<void()>>>& registry() {
  static std::vector<std::pair<const char*, std::function<void()>>> tests;
  return tests;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { registry().emplace_back(name, std::move(fn)); }
};

inline int run_all() {
  for (auto& [name, fn] : registry()) {
    const int before = failures();
    fn();
    std::printf("%s %s\n", failures() == before ? "ok  " : "FAIL", name);
  }
  return failures() == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

}  // namespace check

#define CHECK(cond)                                          \
  do {                                                       \
    if (!(cond)) check::fail(__FILE__, __LINE__, #cond);     \
  } while (0)

#define CHECK_EQ(a, b)                                                                          \
  do {                                                                                          \
    const auto va_ = (a);                                                                       \
    const auto vb_ = (b);                                                                       \
    if (!(va_ == vb_))                                                                          \
      check::fail(__FILE__, __LINE__,                                                           \
                  std::string(#a " == " #b " (") + std::to_string(va_) + " vs " + std::to_string(vb_) + ")"); \
  } while (0)

#define TEST_CASE(name)                                          \
  static void name();                                            \
  static const check::Register name##_registered(#name, name);   \
  static void name()

#define TEST_MAIN() \
  int main() { return check::run_all(); }
