// Cosmos DB Built-in Data Contributor (data-plane RBAC, not an ARM role) for one identity.
//
// Every sqlRoleAssignments PUT takes an exclusive lock on the whole account; a concurrent one
// is answered 412 PreconditionFailed ("another user operation in progress which requires an
// exclusive lock"), which ARM does not retry. So main.bicep deploys this module in one loop with
// @batchSize(1), never from parallel instances of another module (infra/tests/check_structure.py
// keeps it that way).

param cosmosAccountName string
param principalId string

@description('The app resource ID: the name is guid(account, app, role), as the app module made it before, so a re-run updates that assignment in place.')
param assigneeKey string

var dataContributor = '00000000-0000-0000-0000-000000000002'

resource cosmos 'Microsoft.DocumentDB/databaseAccounts@2024-11-15' existing = {
  name: cosmosAccountName
}

resource access 'Microsoft.DocumentDB/databaseAccounts/sqlRoleAssignments@2024-11-15' = {
  parent: cosmos
  name: guid(cosmos.id, assigneeKey, dataContributor)
  properties: {
    roleDefinitionId: '${cosmos.id}/sqlRoleDefinitions/${dataContributor}'
    principalId: principalId
    scope: cosmos.id
  }
}
