#include "kagemusha/common/progress.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <nlohmann/json.hpp>

namespace kagemusha {
namespace {

TEST(ProgressReporter, JsonModeWritesOneObjectPerLine) {
  char* buf = nullptr;
  size_t len = 0;
  FILE* out = open_memstream(&buf, &len);
  {
    ProgressReporter p(ProgressReporter::Mode::kJson, stderr, out);
    p.Update({"fill", 50, 100, 10.0, 5.0, "B"});
    p.Event("switched", {{"mode", "target"}}, "now serving locally");
  }
  std::fclose(out);
  std::string text(buf, len);
  free(buf);
  auto nl = text.find('\n');
  ASSERT_NE(nl, std::string::npos);
  auto first = nlohmann::json::parse(text.substr(0, nl));
  EXPECT_EQ(first["event"], "progress");
  EXPECT_EQ(first["done"], 50);
  EXPECT_EQ(first["eta_seconds"], 5.0);
  auto second = nlohmann::json::parse(text.substr(nl + 1, text.find('\n', nl + 1) - nl - 1));
  EXPECT_EQ(second["event"], "switched");
  EXPECT_EQ(second["mode"], "target");
}

TEST(ProgressReporter, BarShowsPercentAndEta) {
  std::string bar = ProgressReporter::RenderBar({"fill", 1 << 20, 4 << 20, 1024.0, 3.0, "B"}, 8);
  EXPECT_NE(bar.find("[##......]"), std::string::npos) << bar;
  EXPECT_NE(bar.find("25.0%"), std::string::npos) << bar;
  EXPECT_NE(bar.find("ETA 3s"), std::string::npos) << bar;
}

}  // namespace
}  // namespace kagemusha
