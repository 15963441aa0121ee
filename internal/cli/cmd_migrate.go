package cli

import (
	"context"
	"io"

	"github.com/spf13/cobra"

	"github.com/onebox-project/onebox/testbed"
)

// migrateCommands are the migration verbs (issue 4): migrate, checkpoint,
// restore. Stub.
func migrateCommands() []*cobra.Command { return nil }

// procBenchCommands are 'onebox bench' subcommands of the process space. Stub.
func procBenchCommands() []*cobra.Command { return nil }

// demoMigrate is the demo's migration step. Stub.
func demoMigrate(_ context.Context, _ io.Writer, _ *testbed.Cluster) error { return nil }
