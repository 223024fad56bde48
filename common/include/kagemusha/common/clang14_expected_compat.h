// Fuzz-build-only work-around, force-included (-include) into every target
// of the libFuzzer build (cmake/KagemushaTarget.cmake) when the compiler is
// clang older than 16. The product itself builds with g++ 12 and never sees it.
//
// Why: libstdc++ 12 gives std::expected two destructors, one defaulted and one
// constrained ("conditionally trivial special members", P0848). clang 14 does
// not implement P0848, picks the defaulted one, and deletes it whenever T or E
// is not trivially destructible. kagemusha::Error holds a std::string, so
// every kagemusha::Result<T> fails to compile under clang 14 ("attempt to use
// a deleted function ... ~expected() = default"). Raising __cpp_concepts (see
// cmake/KagemushaTarget.cmake) only makes <expected> visible; it cannot fix
// this.
//
// What: a constrained partial specialization of std::expected for
// E = kagemusha::Error with one plain destructor, providing the subset of the
// std::expected interface the codecs use (construction from values and
// std::unexpected, copy/move, has_value/bool, *, ->, value, error, value_or).
// [namespace.std] permits specializing a standard class template for a
// program-defined type. It is declared before error.h is parsed (error.h's
// Ok() instantiates expected<void, Error>), hence the forward declaration and
// the requires-clauses instead of naming Error directly.
#pragma once

#if defined(__clang__) && __clang_major__ < 16

// <expected> is only visible with __cpp_concepts >= 202002L, but raising it
// also switches <variant> (and friends) onto their P0848 code paths,
// which clang 14 mishandles the same way (std::variant of a std::vector gets a
// deleted destructor). So: include those headers with clang 14's true value
// first (their include guards then keep that version), raise the macro only
// for <expected>, and fix <expected> below.
#undef __cpp_concepts
#define __cpp_concepts 201907L
#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>
#undef __cpp_concepts
#define __cpp_concepts 202002L
#include <expected>

namespace kagemusha {
class Error;
}

namespace std {

template <class T, class E>
requires is_same_v<E, kagemusha::Error> &&(!is_void_v<T>)class expected<T, E> {
 public:
  using value_type = T;
  using error_type = E;
  using unexpected_type = unexpected<E>;

  expected(const expected& o) : has_(o.has_) {
    if (has_)
      std::construct_at(&val_, o.val_);
    else
      std::construct_at(&err_, o.err_);
  }
  expected(expected&& o) noexcept(is_nothrow_move_constructible_v<T>) : has_(o.has_) {
    if (has_)
      std::construct_at(&val_, std::move(o.val_));
    else
      std::construct_at(&err_, std::move(o.err_));
  }
  template <class U = T>
  requires(!is_same_v<remove_cvref_t<U>, expected> && !is_same_v<remove_cvref_t<U>, in_place_t> &&
           !is_same_v<remove_cvref_t<U>, unexpect_t> &&
           is_constructible_v<T, U>) explicit(!is_convertible_v<U, T>) expected(U&& v)
      : has_(true) {
    std::construct_at(&val_, std::forward<U>(v));
  }
  template <class G>
  expected(const unexpected<G>& u) : has_(false) {
    std::construct_at(&err_, u.error());
  }
  template <class G>
  expected(unexpected<G>&& u) : has_(false) {
    std::construct_at(&err_, std::move(u.error()));
  }
  template <class... A>
  explicit expected(in_place_t, A&&... a) : has_(true) {
    std::construct_at(&val_, std::forward<A>(a)...);
  }
  template <class... A>
  explicit expected(unexpect_t, A&&... a) : has_(false) {
    std::construct_at(&err_, std::forward<A>(a)...);
  }
  ~expected() { Destroy(); }

  expected& operator=(const expected& o) {
    if (this != &o) {
      Destroy();
      std::construct_at(this, o);
    }
    return *this;
  }
  expected& operator=(expected&& o) noexcept(is_nothrow_move_constructible_v<T>) {
    if (this != &o) {
      Destroy();
      std::construct_at(this, std::move(o));
    }
    return *this;
  }

  bool has_value() const noexcept { return has_; }
  explicit operator bool() const noexcept { return has_; }
  T& operator*() & noexcept { return val_; }
  const T& operator*() const& noexcept { return val_; }
  T&& operator*() && noexcept { return std::move(val_); }
  T* operator->() noexcept { return std::addressof(val_); }
  const T* operator->() const noexcept { return std::addressof(val_); }
  T& value() & {
    if (!has_) throw bad_expected_access<E>(err_);
    return val_;
  }
  const T& value() const& {
    if (!has_) throw bad_expected_access<E>(err_);
    return val_;
  }
  T&& value() && {
    if (!has_) throw bad_expected_access<E>(err_);
    return std::move(val_);
  }
  E& error() & noexcept { return err_; }
  const E& error() const& noexcept { return err_; }
  E&& error() && noexcept { return std::move(err_); }
  template <class U>
  T value_or(U&& fallback) const& {
    return has_ ? val_ : static_cast<T>(std::forward<U>(fallback));
  }

 private:
  void Destroy() {
    if (has_)
      std::destroy_at(&val_);
    else
      std::destroy_at(&err_);
  }
  union {
    T val_;
    E err_;
  };
  bool has_;
};

// expected<void, E> by pattern (not by constraint), so it is more specialized
// than libstdc++'s own "requires is_void_v<_Tp>" partial specialization.
template <class E>
requires is_same_v<E, kagemusha::Error>
class expected<void, E> {
 public:
  using value_type = void;
  using error_type = E;
  using unexpected_type = unexpected<E>;

  expected() noexcept : has_(true) {}
  expected(const expected& o) : has_(o.has_) {
    if (!has_) std::construct_at(&err_, o.err_);
  }
  expected(expected&& o) noexcept : has_(o.has_) {
    if (!has_) std::construct_at(&err_, std::move(o.err_));
  }
  template <class G>
  expected(const unexpected<G>& u) : has_(false) {
    std::construct_at(&err_, u.error());
  }
  template <class G>
  expected(unexpected<G>&& u) : has_(false) {
    std::construct_at(&err_, std::move(u.error()));
  }
  explicit expected(in_place_t) noexcept : has_(true) {}
  ~expected() { Destroy(); }

  expected& operator=(const expected& o) {
    if (this != &o) {
      Destroy();
      std::construct_at(this, o);
    }
    return *this;
  }
  expected& operator=(expected&& o) noexcept {
    if (this != &o) {
      Destroy();
      std::construct_at(this, std::move(o));
    }
    return *this;
  }

  bool has_value() const noexcept { return has_; }
  explicit operator bool() const noexcept { return has_; }
  void operator*() const noexcept {}
  void value() const {
    if (!has_) throw bad_expected_access<E>(err_);
  }
  E& error() & noexcept { return err_; }
  const E& error() const& noexcept { return err_; }
  E&& error() && noexcept { return std::move(err_); }

 private:
  void Destroy() {
    if (!has_) std::destroy_at(&err_);
  }
  union {
    E err_;
  };
  bool has_;
};

}  // namespace std

#endif  // clang < 16
