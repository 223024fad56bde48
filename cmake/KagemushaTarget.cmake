# Shared helpers for module CMakeLists: warnings, one library per module,
# one GoogleTest binary per module, and libFuzzer targets.

function(kagemusha_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wshadow
    -Wnon-virtual-dtor -Wcast-align -Wunused -Wimplicit-fallthrough)
  if(KAGEMUSHA_WERROR)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
  if(KAGEMUSHA_FUZZ)
    target_compile_options(${target} PRIVATE -fsanitize=fuzzer-no-link,address,undefined
      -Wno-gnu-zero-variadic-macro-arguments)
    # clang < 16 cannot use libstdc++ 12's std::expected<T, kagemusha::Error>
    # as is; the compat header explains why and supplies a minimal stand-in.
    if(CMAKE_CXX_COMPILER_ID STREQUAL "Clang" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 16)
      target_compile_options(${target} PRIVATE -Wno-macro-redefined
        "SHELL:-include ${PROJECT_SOURCE_DIR}/common/include/kagemusha/common/clang14_expected_compat.h")
    endif()
  endif()
endfunction()

# kagemusha_module(NAME <lib> DIR <dir> [PURE] [DEPS ...])
# Sources: every <dir>/*.cc except *_test.cc, fuzz_*.cc and *_main.cc.
# With KAGEMUSHA_FUZZ only files listed in PURE_SOURCES are built.
function(kagemusha_module)
  cmake_parse_arguments(M "" "NAME" "DEPS;PURE_SOURCES;TEST_DEPS" ${ARGN})
  if(KAGEMUSHA_FUZZ)
    # PURE_SOURCES are file names in the module directory; the ones that
    # exist are the fuzz build's library (no Boost, spdlog or OpenSSL).
    set(srcs)
    foreach(f ${M_PURE_SOURCES})
      if(EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${f})
        list(APPEND srcs ${CMAKE_CURRENT_SOURCE_DIR}/${f})
      endif()
    endforeach()
  else()
    file(GLOB srcs CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/*.cc)
    list(FILTER srcs EXCLUDE REGEX "(_test|_main|/fuzz_[^/]*)\\.cc$")
  endif()
  if(NOT srcs)
    add_library(${M_NAME} INTERFACE)
    target_include_directories(${M_NAME} INTERFACE ${CMAKE_CURRENT_SOURCE_DIR}/include)
    target_link_libraries(${M_NAME} INTERFACE ${M_DEPS})
    return()
  endif()
  add_library(${M_NAME} STATIC ${srcs})
  target_include_directories(${M_NAME} PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/include
                                       PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
  target_link_libraries(${M_NAME} PUBLIC ${M_DEPS})
  kagemusha_warnings(${M_NAME})

  if(NOT KAGEMUSHA_FUZZ)
    file(GLOB tests CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/*_test.cc)
    if(tests)
      add_executable(${M_NAME}_test ${tests})
      target_include_directories(${M_NAME}_test PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
      target_link_libraries(${M_NAME}_test PRIVATE ${M_NAME} ${M_TEST_DEPS} GTest::gmock GTest::gtest_main)
      kagemusha_warnings(${M_NAME}_test)
      gtest_discover_tests(${M_NAME}_test DISCOVERY_TIMEOUT 60 PROPERTIES LABELS unit)
    endif()
  endif()

  # fuzz_<what>.cc files become libFuzzer executables in the fuzz build.
  if(KAGEMUSHA_FUZZ)
    file(GLOB fuzzers CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/fuzz_*.cc)
    foreach(f ${fuzzers})
      get_filename_component(n ${f} NAME_WE)
      add_executable(${n} ${f})
      target_link_libraries(${n} PRIVATE ${M_NAME})
      kagemusha_warnings(${n})
      target_link_options(${n} PRIVATE -fsanitize=fuzzer,address,undefined)
    endforeach()
  endif()
endfunction()
