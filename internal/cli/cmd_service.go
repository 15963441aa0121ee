package cli

import (
	"context"
	"io"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/onebox-project/onebox/agent"
	"github.com/onebox-project/onebox/testbed"
)

// serviceCommands are the services verbs (issue 5): expose, services. Stub.
func serviceCommands() []*cobra.Command { return nil }

// serviceBenchCommands are 'onebox bench' subcommands of services. Stub.
func serviceBenchCommands() []*cobra.Command { return nil }

// serviceAgentFlags registers the agent's service flags on f (values in
// cfg) and returns a func that copies the flags the user set into final.
func serviceAgentFlags(_ *pflag.FlagSet, _ *agent.Config) func(final *agent.Config) {
	return func(*agent.Config) {}
}

// demoService is the demo's services step. Stub.
func demoService(_ context.Context, _ io.Writer, _ *testbed.Cluster) error { return nil }
