// Test helpers that need neither SQLite nor a server: a scratch directory to
// write files into (AWS config files, credential files, scripts), and an
// environment made of a map for the settings and credentials readers.
#pragma once

#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <string_view>

#include <catch2/catch.hpp>

#include "s3/config.h"

namespace bottomless::testing {

// A fresh directory under the system's temp directory, removed afterwards.
struct ScratchDir {
    std::filesystem::path path;
    explicit ScratchDir(const std::string& prefix = "bottomless-scratch") {
        std::string tmpl = (std::filesystem::temp_directory_path() / (prefix + "-XXXXXX")).string();
        REQUIRE(mkdtemp(tmpl.data()) != nullptr);
        path = tmpl;
    }
    ~ScratchDir() { std::filesystem::remove_all(path); }
    ScratchDir(const ScratchDir&) = delete;
    ScratchDir& operator=(const ScratchDir&) = delete;
    // Writes `text` to `name` (subdirectories created); returns the path.
    std::string write(const std::string& name, const std::string& text) const {
        std::filesystem::path p = path / name;
        std::filesystem::create_directories(p.parent_path());
        std::ofstream(p) << text;
        return p.string();
    }
};

// An environment holding exactly `vars`.
inline s3::EnvLookup env_of(std::map<std::string, std::string> vars) {
    return [vars = std::move(vars)](std::string_view n) -> std::optional<std::string> {
        auto it = vars.find(std::string(n));
        if (it == vars.end()) return std::nullopt;
        return it->second;
    };
}

}  // namespace bottomless::testing
