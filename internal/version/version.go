// Package version holds the onebox version, set at build time with
// -ldflags "-X github.com/onebox-project/onebox/internal/version.Version=...".
package version

// Version of this build.
var Version = "0.1.0-dev"
