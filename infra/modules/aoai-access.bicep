// Deployed at the scope of an existing Azure OpenAI resource's resource group: grants one
// Function App identity "Cognitive Services OpenAI User" on that resource (keyless calls).

param aoaiName string
param principalId string

@description('Any stable string identifying the app (used to name the assignment).')
param appId string

var openAiUser = '5e0bd9bd-7b93-4f28-af87-19fc36ad61bd'

resource aoai 'Microsoft.CognitiveServices/accounts@2024-10-01' existing = {
  name: aoaiName
}

resource access 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(aoai.id, appId, openAiUser)
  scope: aoai
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', openAiUser)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}
